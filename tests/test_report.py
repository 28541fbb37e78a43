"""normtf report: one self-contained page of a runs directory. The committed page (docs/report.html)
holds the README's numbers and every run of results/, embeds everything it shows, and opens in a
real browser with the network off (slow tier); a page made through the command names what it
could not read; bad input is one line and its exit code."""

import base64
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from normtf import report
from normtf.precise_bn import MEASURES, PRECISE, PRECISE_DROPOUT_ON

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "results"
PAGE = ROOT / "docs" / "report.html"
REGENERATE = "normtf report --runs-dir results --out docs/report.html"


def tables(page: str) -> dict[str, list[list[str]]]:
    """{table id: rows of cell texts} of every table with an id, its header row first."""
    found = {}
    for table_id, body in re.findall(r'<table id="([^"]+)">(.*?)</table>', page, flags=re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)
        found[table_id] = [[html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
                            for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, flags=re.S)] for row in rows]
    return found


def bokeh_models(page: str) -> list[dict]:
    """Every model of the page's Bokeh documents, as the embedded JSON gives them."""
    docs = re.search(r"const docs_json = '(.*?)';\n", page)  # as bokeh.embed.components writes it
    models = []

    def walk(value):
        if isinstance(value, dict):
            if value.get("type") == "object" and "name" in value:
                models.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json.loads(docs.group(1)))
    return models


def legend_labels(page: str) -> list[str]:
    return [m["attributes"]["label"]["value"] for m in bokeh_models(page) if m["name"] == "LegendItem"]


def expected_tables(root: Path = RESULTS, relative_to: Path = ROOT) -> dict[str, list[list[str]]]:
    """The results tables as normtf.report computes them from the files now, keyed as in the page."""
    expected = {}
    for study in report.find_studies(root.relative_to(relative_to) if relative_to else root):
        rows = report.rows(study)
        if rows:
            expected[f"results-{study.key}"] = [report.RESULTS_HEADER, *[row.cells() for row in rows]]
    return expected


@pytest.fixture(scope="module")
def committed():
    return PAGE.read_text()


def test_the_committed_page_is_current_with_results(committed, monkeypatch):
    """Every results table of docs/report.html is what the runs in results/ give today, and the
    page says which command made it."""
    monkeypatch.chdir(ROOT)
    assert {k: v for k, v in tables(committed).items() if k.startswith("results-")} == expected_tables()
    assert f"made by <code>{REGENERATE}</code>" in committed


def readme_rows() -> list[tuple[str, list[str]]]:
    """(dataset, cells) of the README's several-seed tables: the last heading above names the dataset."""
    rows, dataset = [], "mnist"
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("#"):
            dataset = "fashion-mnist" if "Fashion-MNIST" in line else "mnist"
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ("reference", "tuned"):
            rows.append((dataset, cells))
    return rows


def test_the_committed_page_has_the_readmes_numbers_and_commands(committed, monkeypatch):
    """Each row of the README's tables is the same row of the page's table of its runs directory
    (results/<recipe>), and the README's commands are the page's, less where their figures go."""
    monkeypatch.chdir(ROOT)
    found = tables(committed)
    assert len(readme_rows()) == 8  # the MNIST headline: the eight variants that learn
    for dataset, cells in readme_rows():
        table = found[f"results-results-{cells[1]}-{dataset}"]
        assert cells in table, cells
    readme = (ROOT / "README.md").read_text()
    for command in re.findall(r"^(normtf compare .* --runs-dir results/\w+) --img-dir \S+$", readme, flags=re.M):
        assert f"{html.escape(command)}\n" in committed or f"{html.escape(command)}</pre>" in committed, command


def test_the_committed_page_embeds_everything_it_shows(committed):
    """Nothing is fetched: no script, style or image from elsewhere; every image a PNG inside the
    page; a curve of every variant of every table, and the sweep with each of its measures; every
    run of results/ in the provenance tables; small enough to mail."""
    assert len(committed.encode()) < 4_000_000
    assert not re.search(r"<(script|img|iframe)[^>]+src=\"(?!data:)", committed)
    assert not re.search(r"<link[^>]+href=", committed)
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([^"]+)">', committed)
    assert len(images) == committed.count("<img ") >= 200
    for image in images[:20]:
        raw = base64.b64decode(image)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(raw[16:20], "big") == 28  # width 28
    labels = legend_labels(committed)
    for study in report.find_studies(RESULTS):
        for row in report.rows(study):
            assert any(label.startswith(f"{row.norm} (") for label in labels), (study.directory, row.norm)
    sweep = json.loads((RESULTS / "sweep.json").read_text())
    norms = {row["norm"] for row in sweep["rows"]}
    measured = {f"{row['norm']}, {MEASURES[m]}" for row in sweep["rows"] for m in (PRECISE, PRECISE_DROPOUT_ON)
                if row.get(m) is not None}
    assert {"batch, precise, dropout off", "batch-renorm, precise, dropout off"} <= measured
    assert measured | (norms - {"batch", "batch-renorm"}) <= set(labels)
    runs = [p.parent for p in RESULTS.rglob("config.json")]
    assert len(runs) == 77 and all(f"<code>{p.relative_to(RESULTS)}</code>" in committed for p in runs)
    assert committed.count("<details><summary>config.json</summary>") == len(runs)


def copy_run(source: Path, destination: Path, without: tuple[str, ...] = ()) -> Path:
    destination.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in without:
            shutil.copy(path, destination / path.name)
    return destination


def small_study(root: Path) -> Path:
    """Two seeds of batch norm as trained; group norm as an older normtf left it (config.json
    without provenance, no history.csv, fewer metrics, no model); a layer-norm run whose
    metrics.json was cut off; a sweep with a measure this normtf does not write."""
    study = root / "runs"
    for seed in (42, 43):
        copy_run(RESULTS / "reference" / "batch" / f"seed-{seed}", study / "batch" / f"seed-{seed}")
    old = copy_run(RESULTS / "reference" / "group" / "seed-42", study / "group" / "seed-42",
                   without=("history.csv", "model.keras"))
    record = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({"config": record["config"]}))
    metrics = json.loads((old / "metrics.json").read_text())
    (old / "metrics.json").write_text(json.dumps({k: metrics[k] for k in ("final_test_accuracy", "status")}))
    broken = copy_run(RESULTS / "reference" / "layer" / "seed-42", study / "layer" / "seed-42")
    (broken / "metrics.json").write_text((broken / "metrics.json").read_text()[:40])
    sweep = json.loads((RESULTS / "sweep.json").read_text())
    for row in sweep["rows"]:
        if row["norm"] == "batch":
            row["test_error_percent_precise_bn_dropout"] = row["test_error_percent"] - 1
    sweep["rows"].append({"norm": "batch"})  # no batch size: unreadable
    (study / "sweep.json").write_text(json.dumps(sweep))
    return study


def normtf(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "normtf", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`normtf report --count 3` through the command, on small_study (evaluates two models on MNIST's test set)."""
    root = tmp_path_factory.mktemp("report")
    study = small_study(root)
    result = normtf("report", "--runs-dir", study, "--count", 3)
    return study, result


def test_report_through_the_command_names_what_it_could_not_read(made):
    study, result = made
    assert result.returncode == 0, result.stderr
    page = (study / "report.html").read_text()
    assert result.stdout.strip() == (f"wrote {study / 'report.html'} ({len(page.encode()) / 1e6:.1f} MB): 4 runs in "
                                     "1 directory, 1 sweep; 3 could not be read whole, named in the page")
    found = tables(page)[f"results-{report.find_studies(study)[0].key}"]
    assert [row[:4] for row in found[1:]] == [["batch", "reference", "9,910", "42, 43"], ["group", "reference", "–", "42"]]
    assert found[2][4:] == ["99.21", "99.21", "99.35"]  # the older run's best, from its history
    problems = page.split('<ul class="problem">')[1].split("</ul>")[0]
    assert "layer/seed-42</code>: metrics.json is unreadable" in problems
    assert "group/seed-42</code>: no model.keras" in problems
    assert "sweep.json</code>: 1 of its rows could not be read" in problems
    assert page.count('<span class="note">not recorded</span>') >= 4  # the older run's provenance
    gallery = page.split('class="galleries"')[1].split("<h4>Runs</h4>")[0]
    assert gallery.count("<img ") == 3 and "of its 81 misclassified MNIST test images" in gallery
    assert "no model at" in gallery  # group's: said where its images would be
    assert "<code>batch</code>, precise bn dropout" in page  # the sweep's third measure, in the table
    assert "batch, precise bn dropout" in legend_labels(page)
    assert 'id="tuning"' not in page


def test_the_page_says_when_the_dataset_cannot_be_loaded(tmp_path):
    study = tmp_path / "runs"
    copy_run(RESULTS / "reference" / "batch" / "seed-42", study / "batch" / "seed-42")
    (tmp_path / "empty").mkdir()
    said = []
    built = report.build(study, tmp_path / "page.html", data_dir=tmp_path / "empty", warn=said.append)
    page = built.path.read_text()
    assert "The misclassified images need the MNIST test set to evaluate each model, and it could not be loaded" in page
    assert "<img " not in page and len(said) == 1


def a_tuning(directory: Path) -> dict:
    """A tuning's tune.json as normtf tune writes it (tune.summarize), of studies told by hand:
    batch's best is trial 0, group's trial 1, one of batch's trials diverged."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from normtf import tune
    from normtf.config import TrainConfig
    from normtf.files import write_json

    studies = {}
    for norm, told in {"batch": [0.9912, 0.9871, None], "group": [0.9880, 0.9905]}.items():
        study = optuna.create_study(direction="maximize")
        for number, value in enumerate(told):
            study.add_trial(create_trial(params={"lr": 0.01 * 3**number, "schedule": "one-cycle", "dropout": 0.05},
                                         distributions=tune.space(norm), value=value,
                                         state=TrialState.COMPLETE if value else TrialState.PRUNED))
        studies[norm] = study
    summary = tune.summarize(studies, TrainConfig(epochs=5, validation=10_000), directory, 3, 50_000)
    write_json(directory / "tune.json", summary)
    return summary


def test_a_sweep_alone_is_a_page_and_a_tuning_shows_each_variants_best_recipe(tmp_path):
    shutil.copy(RESULTS / "sweep.json", tmp_path / "sweep.json")
    a_tuning(tmp_path / "tune")
    page = report.build(tmp_path, tmp_path / "page.html").path.read_text()
    header = tables(page)["sweep-table-0"][0]
    assert header[:3] == ["batch size", "lr", "batch, moving averages"] and "batch, precise, dropout off" in header
    assert 'id="tuning"' in page and f"normtf tune --runs-dir {tmp_path / 'tune'}" in page
    assert tables(page)["tuning-table-0"][1:] == [["batch", "3 (1)", "99.12", "0", "0.01", "one-cycle", "0.050", "-"],
                                                  ["group", "2 (0)", "99.05", "1", "0.03", "one-cycle", "0.050", "-"]]
    assert 'alt="validation accuracy against learning rate, every trial" src="data:image/png;base64,' in page
    assert "normtf sweep --norm batch --norm layer --norm group --norm none --norm batch-renorm --norm group-ws " \
           f"--batch-sizes 2,4,8,16,32,64,128 --out {tmp_path / 'sweep.json'}" in page


def test_a_run_off_its_recipe_gets_the_flags_that_reproduce_it(tmp_path):
    run = copy_run(RESULTS / "tuned" / "group" / "seed-42", tmp_path / "runs" / "group")  # normtf train's place
    record = json.loads((run / "config.json").read_text())
    record["config"].update(epochs=2, train_size=1000, seed=7)
    (run / "config.json").write_text(json.dumps(record))
    study = report.find_studies(tmp_path / "runs")[0]
    table = report.rows(study)
    assert [row.cells()[:4] for row in table] == [["group", "tuned --epochs 2 --train-size 1000", "9,910", "7"]]
    assert report.commands(study, table) == [
        f"normtf compare --norm group --recipe tuned --epochs 2 --train-size 1000 --seed 7 --runs-dir {tmp_path / 'runs'}"]


@pytest.mark.parametrize("args,code,message", [
    (["--runs-dir", "{tmp}/empty"], 1, "error: no runs in {tmp}/empty: nothing to report; train first"),
    (["--runs-dir", "{tmp}/none"], 1, "error: --runs-dir {tmp}/none is not a directory"),
    (["--runs-dir", "{tmp}/runs", "--out", "{tmp}/file/page.html"], 1,
     "error: cannot write to {tmp}/file: Not a directory; choose a writable --out"),
    (["--runs-dir", "{tmp}/runs", "--out", "{tmp}/empty"], 1, "error: --out {tmp}/empty is a directory; name the page's file"),
    (["--runs-dir", "{tmp}/runs", "--count", "0"], 2, "error: --count must be a whole number from 1 to 10,000"),
], ids=["no runs", "no directory", "unwritable out", "out a directory", "bad count"])
def test_bad_input_is_one_line_and_its_exit_code(tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    copy_run(RESULTS / "reference" / "batch" / "seed-42", tmp_path / "runs" / "batch" / "seed-42")
    result = normtf("report", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == code and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message.format(tmp=tmp_path)), result.stderr
    assert not list(tmp_path.rglob("*.html"))


# --- In a real browser --------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    """Debian's headless Chromium through its chromedriver, with the network closed: offline,
    every host name unresolvable, no background connections; a fresh profile."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                     "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tempfile.mkdtemp(prefix='normtf-chromium-')}"]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    return driver


RENDERED = """return typeof Bokeh !== 'undefined' && Bokeh.documents.length > 0 && Bokeh.documents.every(d => d.is_idle)
    && Array.from(document.querySelectorAll('.curves, .sweep')).every(d => d.querySelector('.bk-GridPlot, .bk-Figure'))"""


def open_page(driver, page: Path) -> list[str]:
    """Open the page from disk and wait until Bokeh has drawn every plot; the URLs of every request
    the page made."""
    driver.get("about:blank")
    driver.get_log("performance")  # the browser's own start-up pages: not the page's
    driver.get(page.resolve().as_uri())
    deadline = time.monotonic() + 180
    while not driver.execute_script(RENDERED) and time.monotonic() < deadline:
        time.sleep(0.5)
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def check_in_browser(page: Path, tmp_path: Path, rows: dict[str, list[list[str]]]) -> None:
    text = page.read_text()
    driver = browser()
    try:
        urls = open_page(driver, page)
        assert urls and all(url.startswith(("file:", "data:")) for url in urls), [u[:80] for u in urls if not u.startswith(("file:", "data:"))]
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        assert driver.execute_script(RENDERED), "the plots were not drawn in 3 minutes"
        shown = driver.execute_script("""
            return Array.from(document.querySelectorAll('table[id^="results-"]')).map(t => [t.id,
                Array.from(t.querySelectorAll('tbody tr')).map(r => r.cells[0].textContent)])""")
        assert {table: variants for table, variants in shown} == {t: [r[0] for r in v[1:]] for t, v in rows.items()}
        legend = driver.execute_script("""
            const items = [];
            for (const doc of Bokeh.documents) for (const m of doc.all_models)
                if (m.type === 'LegendItem') items.push([m.label.value, m.renderers.length]);
            return items""")
        for table, body in rows.items():
            for cells in body[1:]:
                assert any(label.startswith(f"{cells[0]} (") and count == 12 for label, count in legend), (table, cells[0])
        images = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert len(images) == text.count("<img ") and all(width == 28 for width in images)
        from PIL import Image, ImageStat

        for i, element in enumerate(driver.find_elements("css selector", ".curves, .sweep")[:2]):
            driver.execute_script("arguments[0].scrollIntoView()", element)
            shot = tmp_path / f"plot-{i}.png"
            element.screenshot(str(shot))
            picture = Image.open(shot).convert("L")
            assert picture.width > 600 and ImageStat.Stat(picture).stddev[0] > 20, shot  # drawn, not blank
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_committed_page_in_a_browser_with_the_network_off(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_in_browser(PAGE, tmp_path, expected_tables())


@pytest.mark.slow
def test_a_page_made_by_the_command_in_a_browser(made, tmp_path):
    study, result = made
    assert result.returncode == 0, result.stderr
    check_in_browser(study / "report.html", tmp_path, expected_tables(study, None))
