from seiscli.launcher.cli import main

main()
