"""The on-disk format: manifest schema, segment layout, zarr layout, checksums."""
