"""What a mask costs in quality, and the search for a good one: data, metrics, calibration, strategies, held out."""
