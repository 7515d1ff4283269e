"""What is on disk and whose: ownership by content (markers, links, locks, temporaries), the
saved training states, and the checkpointer that saves and loads them."""
