"""RunPod serverless: the handler, request parsing, progress, the local test API."""
