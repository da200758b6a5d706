"""`pagoda bench reliability`: a live server under fuzzing, overload, faults and model swaps
(fuzz, load, soak, faults, swaps; suite ties them into the short and full profiles)."""
