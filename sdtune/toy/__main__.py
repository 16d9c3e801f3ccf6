"""`python -m sdtune.toy`: print the folder of the shipped toy base, for `model.path=`."""

from sdtune.toy import TOY_BASE_DIR

print(TOY_BASE_DIR)
