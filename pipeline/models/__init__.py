"""What we know about models and providers: context windows, output caps, structured-output support
(catalog), and what their rate-limit headers say (headers). Prices live with the config and the price
library (prices); nothing here touches the network."""
