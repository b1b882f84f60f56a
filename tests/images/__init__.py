"""Independent image writers used only by the tests."""
