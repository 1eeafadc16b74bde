from seiscli.cli import main

main()
