"""Code generated from proto/p2p.proto by proto/generate.py. Do not edit."""
