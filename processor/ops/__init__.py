"""What operators see: metrics, health, webhooks, the ops HTTP server, the network volume."""
