# Makes the repository root importable for tests and tools run from a checkout.
