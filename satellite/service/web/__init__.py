"""The fleet page of `satellite serve` (DESIGN §12): server-rendered HTML over the API's data."""
