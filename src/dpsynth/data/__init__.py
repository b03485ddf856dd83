"""Data: measurement of label masks, the phantom simulator, dataset layouts and the cache."""
