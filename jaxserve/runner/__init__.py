"""Device side: the jitted model step and the code that feeds it."""
