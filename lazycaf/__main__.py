from lazycaf.cli.entry import console_main

console_main()
