"""Wire contract version 1: sampling.proto, target.proto, generation.proto and their generated stubs."""
