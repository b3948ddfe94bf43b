"""Images in, videos out: image preparation, video encoding, frame interpolation."""
