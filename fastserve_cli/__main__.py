from fastserve_cli.cli import main

main()
