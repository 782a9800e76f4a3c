// Forced-include for a CPU build of the public MOQUI engine (moqui_rev 8c844e5); MQI Communicator's
// build aid, not engine code. The engine's mqi_math.hpp gives mqi_uniform, mqi_normal and
// mqi_exponential a primary template that returns T() (0) and defines their CPU versions only as
// specialisations in mqi_math.cpp, never declared in the header: an optimised build inlines the
// primary into tps_env.cpp, every random number is 0, no proton loses energy and every dose is 0
// (with exit 0 and a normal log). Declaring the specialisations makes the compiler call them.
// .ci/real-tools.sh writes a copy with @MQI_MATH_HPP@ replaced by the engine header's path.
#include "@MQI_MATH_HPP@"
namespace mqi {
template <> float mqi_uniform<float>(mqi_rng *rng);
template <> double mqi_uniform<double>(mqi_rng *rng);
template <> float mqi_normal<float>(mqi_rng *rng, float avg, float sig);
template <> double mqi_normal<double>(mqi_rng *rng, double avg, double sig);
template <> float mqi_exponential<float>(mqi_rng *rng, float avg, float up);
template <> double mqi_exponential<double>(mqi_rng *rng, double avg, double up);
}
