"""Latent collaborative-filtering models fitted on interactions: SASRec (sequential) and
ALS (latent factors), and the sparse user-item matrix they and ItemKNN read.

They sit below the CST (which stores them as evidence signals, fitted on exactly the
interactions its store may see) and below the baselines (which evaluate them on their
own), so each model has one definition that both use. A fitted model becomes a
`ModelState` (parameters, item order, arrays) that a store keeps and rebuilds it from.
"""
