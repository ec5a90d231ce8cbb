"""The HTML contact sheet of a batch (comfys3 report)."""
