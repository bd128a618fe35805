"""BLIP-2 Studio backend: registry, loading, prompts, engine and retrieval, free of any UI code."""
