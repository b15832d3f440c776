"""Pure-PyTorch implementations: the CPU path of every op and the oracle of every test."""
