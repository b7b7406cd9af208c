from staple._cli import main

main()
