"""One attention function with pluggable backends; masks; relative position bias."""
