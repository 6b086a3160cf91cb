from osx.cli import main

main()
