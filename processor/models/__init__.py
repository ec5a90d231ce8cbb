"""Models a manifest names (by URL or Hugging Face path), fetched at run time into a cache that
ComfyUI sees as an extra model path."""
