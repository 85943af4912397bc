from services.prefill_gateway.service import main

main()
