"""The SimPy backend: virtual peers, an emulated network and DHT, and a GPU cost model."""
