"""Read tracked runs back and explain them; never trains."""
