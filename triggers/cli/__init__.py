"""The comfys3 command line: argument parsing and one module per command family."""
