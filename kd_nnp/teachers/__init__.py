"""Teachers: any ASE calculator, built from a spec (calculators), checked, and used to label
stores."""
