from ckptd.daemon.cli import main

main()
