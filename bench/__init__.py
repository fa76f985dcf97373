"""Side-by-side benchmark harness for jobq and its peers (see ``bench/README.md``)."""
