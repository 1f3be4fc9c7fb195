from mixcon.cli import main

main()
