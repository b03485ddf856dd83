"""`dpsynth explore`: a local web page to steer one run's sampler and look at the volumes."""
