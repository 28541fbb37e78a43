from normtf.cli import main

main()
