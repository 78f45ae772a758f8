using Orleans.Placement;
using Orleans.Runtime;
using Orleans.Runtime.Placement;

namespace AnyPrecML.Orleans;

/// <summary>
/// Places a grain whose key is a silo address (<see cref="SiloAddress.ToParsableString"/>) on that silo and nowhere
/// else: one scoring worker per silo, chosen by the job. A key naming a silo that is no longer active fails the call,
/// so the job learns the silo is gone instead of the worker quietly moving onto a silo that already has one.
/// </summary>
[Serializable, GenerateSerializer, Immutable, SuppressReferenceTracking]
public sealed class SiloPinnedPlacement : PlacementStrategy
{
    internal static readonly SiloPinnedPlacement Instance = new();
}

/// <summary>Marks a grain class as placed by <see cref="SiloPinnedPlacement"/>.</summary>
[AttributeUsage(AttributeTargets.Class, AllowMultiple = false)]
public sealed class SiloPinnedPlacementAttribute() : PlacementAttribute(SiloPinnedPlacement.Instance);

internal sealed class SiloPinnedPlacementDirector : IPlacementDirector
{
    public Task<SiloAddress> OnAddActivation(PlacementStrategy strategy, PlacementTarget target, IPlacementContext context)
    {
        string key = target.GrainIdentity.Key.ToString()!;
        var silo = SiloAddress.FromParsableString(key);
        if (!context.GetCompatibleSilos(target).Contains(silo))
            throw new SiloUnavailableException($"scoring worker {key}: that silo is not an active member of the cluster.");
        return Task.FromResult(silo);
    }
}
