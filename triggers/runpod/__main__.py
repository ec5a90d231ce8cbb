"""``python -m triggers.runpod``: the RunPod serverless worker."""

from triggers.runpod.command import main

raise SystemExit(main())
