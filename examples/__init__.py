"""Small programs showing acall at work; the test suite runs each of them."""
