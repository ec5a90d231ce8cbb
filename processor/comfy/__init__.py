"""ComfyUI: the client, its websocket, readable node errors, the process supervisor."""
