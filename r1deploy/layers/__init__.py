"""Model building blocks: pure tensor math, batch metadata passed in explicitly."""
