"""household-digits: three households learn handwritten digits with split CNNs."""
