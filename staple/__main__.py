from staple.cli import main

main()
