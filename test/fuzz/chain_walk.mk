# The split ring walk (native/split_ring.cc): plain C++, no N-API.
chain_walk_SOURCES := ../../native/split_ring.cc
