"""Export of trained models: packed ternary weights."""
