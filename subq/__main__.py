from subq.cli import main

main()
