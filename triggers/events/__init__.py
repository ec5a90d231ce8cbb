"""Work announced from outside: SQS listener, the RunPod dispatcher and its Lambda twin."""
