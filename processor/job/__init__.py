"""One job: the manifest, the status book, the retry table, inputs, outputs, the runner."""
