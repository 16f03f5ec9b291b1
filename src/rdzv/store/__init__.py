"""The Store API and its backends (HashStore, PrefixStore, FileStore, TCPStore, EtcdStore)."""
