"""One module per command: its arguments, what it runs, what it prints. Libraries neither parse nor print."""
