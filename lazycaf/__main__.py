from lazycaf.cli import console_main

console_main()
